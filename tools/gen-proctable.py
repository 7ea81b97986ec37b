#!/usr/bin/env python3
"""Turn data/procedures.tsv (+ data/readonly-flags.tsv) into the C procedure
table (src/proc.h types).

Usage: gen-proctable.py procedures.tsv readonly-flags.tsv out.c out_names.h
       gen-proctable.py --check procedures.tsv readonly-flags.tsv

out_names.h names every procedure (VM_PROC_CONNECT_OPEN, VM_QEMU_PROC_...), and the
table links each callback event to the register procedure it comes from and each
register procedure to its deregister counterpart.

Every row must carry a known kind, read-only verdict and objects class, and every "flags"
verdict must have its deciding argument in readonly-flags.tsv; anything
unclassified fails the build, so a procedure cannot slip in without a decision.
"""
import re
import sys

PROGRAMS = {
    "REMOTE": "VM_PROG_REMOTE",
    "QEMU": "VM_PROG_QEMU",
    "LXC": "VM_PROG_LXC",
    "KEEPALIVE": "VM_PROG_KEEPALIVE",
}
KINDS = {
    "call": "VM_PK_CALL",
    "event": "VM_PK_EVENT",
    "event-register": "VM_PK_EVENT_REGISTER",
    "event-deregister": "VM_PK_EVENT_DEREGISTER",
    "stream-create": "VM_PK_STREAM_CREATE",
    "auth": "VM_PK_AUTH",
    "connection": "VM_PK_CONNECTION",
    "keepalive": "VM_PK_KEEPALIVE",
}
RO = {"yes": "VM_RO_YES", "no": "VM_RO_NO", "flags": "VM_RO_FLAGS"}
# What a procedure names of the objects a policy grant limits (the "objects" column: "none",
# or comma-separated FAMILY:CLASS): where the object sits in its arguments, reply or event,
# or that the procedure cannot be filtered safely for that family.
OBJ_FAMILIES = ("domain", "network", "storage_pool")
OBJ_CLASSES = {
    "domain": {"arg", "in-arg", "xml", "rename", "lookup-name", "lookup", "list-all",
               "stats-all", "list-ids", "list-defined", "num-active", "num-defined", "event",
               "event-cb", "refuse"},
    "network": {"arg", "xml", "lookup-name", "lookup", "list-all", "list-active",
                "list-defined", "num-active", "num-defined", "event-cb"},
    "storage_pool": {"arg", "xml", "lookup-name", "lookup", "lookup-vol", "list-all",
                     "list-active", "list-defined", "num-active", "num-defined", "event-cb",
                     "vol", "vol-lookup", "clone"},
}


def obj_enum(cls):
    return "VM_OBJ_" + cls.upper().replace("-", "_")


def parse_objects(value, where):
    """{"domain": "VM_OBJ_...", ...} for every family (VM_OBJ_NONE when not named)."""
    out = {f: "VM_OBJ_NONE" for f in OBJ_FAMILIES}
    if value == "none":
        return out
    for part in value.split(","):
        fam, _, cls = part.partition(":")
        if fam not in OBJ_CLASSES or cls not in OBJ_CLASSES[fam]:
            sys.exit(f"{where}: unclassified objects entry {part!r}")
        if out[fam] != "VM_OBJ_NONE":
            sys.exit(f"{where}: two entries for {fam}")
        out[fam] = obj_enum(cls)
    return out


PROG_ORDER = {"LXC": 0x00068000, "REMOTE": 0x20008086, "QEMU": 0x20008087,
              "KEEPALIVE": 0x6B656570}


# libvirt error domain of the public API family that refuses a call (the file the
# API lives in decides VIR_FROM_THIS): virDomain* -> DOMAIN, virNetwork* -> NETWORK...
# Snapshot and checkpoint APIs live in their own files whatever their prefix
# (virDomainRevertToSnapshot, virDomainListAllCheckpoints); libvirt-host.c (virConnect*,
# virNode* without another family's noun) uses DOMAIN too, as a read-only libvirtd shows;
# QEMU and LXC refusals come back with NONE (observed through libvirt's client).
ANYWHERE = [("Snapshot", 35), ("Checkpoint", 69)]
FAMILIES = [
    ("virDomain", 20),
    ("virNetwork", 19), ("virStorage", 18), ("virNodeDevice", 22), ("virSecret", 30),
    ("virInterface", 26), ("virNWFilter", 33),
]
CONNECT_FAMILIES = [
    ("Domain", 20), ("StoragePool", 18), ("Network", 19), ("NodeDevice", 22),
    ("Secret", 30), ("Interface", 26), ("NWFilter", 33),
]


def error_domain(api, prog):
    if prog in ("QEMU", "LXC"):
        return 0
    if not api:
        return 0
    if api.startswith("virDomain"):
        for word, dom in ANYWHERE:
            if word in api:
                return dom
    for prefix, dom in FAMILIES:
        if api.startswith(prefix):
            return dom
    if api.startswith("virConnect") or api.startswith("virNode"):
        for word, dom in CONNECT_FAMILIES:
            if word in api:
                return dom
        return 20
    return 0


def load_flags(path):
    rules = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        col = {name: i for i, name in enumerate(header)}
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            c = line.split("\t")
            prefix, test = c[col["prefix"]], c[col["test"]]
            if prefix not in ("dom", "name+dom") or test not in ("mask", "equals"):
                sys.exit(f"{path}:{lineno}: bad prefix/test {prefix!r}/{test!r}")
            rules[(c[col["program"]], int(c[col["number"]]))] = {
                "prefix": prefix, "word": int(c[col["word"]]),
                "test": test, "value": int(c[col["value"]]),
                "message": c[col["message"]], "name": c[col["name"]],
            }
    return rules


def load(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        col = {name: i for i, name in enumerate(header)}
        for need in ("program", "number", "name", "readonly_ok", "kind", "notes", "objects"):
            if need not in col:
                sys.exit(f"{path}: missing column {need}")
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            c = line.split("\t")
            prog, kind, ro = c[col["program"]], c[col["kind"]], c[col["readonly_ok"]]
            if prog not in PROGRAMS:
                sys.exit(f"{path}:{lineno}: unknown program {prog!r}")
            if kind not in KINDS:
                sys.exit(f"{path}:{lineno}: unclassified kind {kind!r}")
            if ro not in RO:
                sys.exit(f"{path}:{lineno}: unclassified readonly verdict {ro!r}")
            objects = parse_objects(c[col["objects"]] if len(c) > col["objects"] else "",
                                    f"{path}:{lineno}")
            notes = c[col["notes"]]
            api = refused_by = ""
            for part in notes.split(";"):
                part = part.strip()
                if part.startswith("api=") and not api:
                    api = part[4:].split(",")[0].strip()
                if part.startswith("refused by ") and not refused_by:
                    refused_by = part[len("refused by "):].split(",")[0].split()[0].strip()
            api = refused_by or api
            source = ""
            m = re.search(r"source: (QEMU )?([A-Z_]+)", notes)
            if m:
                source = ((m.group(1) or "").strip() or prog, m.group(2))
            rows.append({
                "source": source,
                "api": api,
                "domain": error_domain(api, prog),
                "prog": prog,
                "num": int(c[col["number"]]),
                "name": c[col["name"]],
                "kind": kind,
                "ro": ro,
                "cb_first": "callbackID first: yes" in notes,
                "legacy": kind.startswith("event-") and "legacy" in notes,
                "fds_in": "CALL_WITH_FDS" in notes,
                "fds_out": "REPLY_WITH_FDS" in notes,
                "objects": objects,
            })
    rows.sort(key=lambda r: (PROG_ORDER[r["prog"]], r["num"]))
    seen = set()
    for r in rows:
        key = (r["prog"], r["num"])
        if key in seen:
            sys.exit(f"{path}: duplicate procedure {key}")
        seen.add(key)
    return rows


def attach_families(rows, path):
    """Events carry the number of the register procedure whose callback ids they use
    ("family"); register and deregister procedures carry each other's number ("pair")."""
    by_name = {(r["prog"], r["name"]): r for r in rows}
    for r in rows:
        r["family"] = r["pair"] = 0
    for r in rows:
        if r["kind"] == "event" and r["cb_first"]:
            reg = by_name.get(r["source"]) if r["source"] else None
            if not reg or reg["kind"] != "event-register":
                sys.exit(f"{path}: event {r['name']} names no register procedure it comes from")
            r["family"] = reg["num"]
        if r["kind"] == "event-register" and not r["legacy"]:
            dereg = by_name.get((r["prog"], r["name"].replace("_REGISTER", "_DEREGISTER")))
            if not dereg or dereg["kind"] != "event-deregister":
                sys.exit(f"{path}: {r['name']} has no deregister procedure")
            r["family"] = r["num"]
            r["pair"], dereg["pair"] = dereg["num"], r["num"]
            dereg["family"] = r["num"]


def emit_names(rows, out):
    """proc_names.h: VM_PROC_<NAME> for REMOTE, VM_<PROG>_PROC_<NAME> for the others, and
    VM_PROC_KEEPALIVE_<NAME> for keepalive, so code names procedures instead of numbers."""
    lines = ["/* Generated by tools/gen-proctable.py from data/procedures.tsv. Do not edit. */",
             "#ifndef VM_PROC_NAMES_H", "#define VM_PROC_NAMES_H", "", "enum {"]
    for r in rows:
        prefix = {"REMOTE": "VM_PROC_", "KEEPALIVE": "VM_PROC_KEEPALIVE_"}.get(
            r["prog"], "VM_%s_PROC_" % r["prog"])
        lines.append(f"    {prefix}{r['name']} = {r['num']},")
    lines += ["};", "", "#endif", ""]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def attach_flags(rows, flags, path):
    for r in rows:
        key = (r["prog"], r["num"])
        rule = flags.pop(key, None)
        if r["ro"] == "flags" and not rule:
            sys.exit(f"{path}: {r['prog']} {r['num']} {r['name']} is 'flags' but has no rule")
        if rule and r["ro"] != "flags":
            sys.exit(f"{path}: {r['name']} has a rule but is not 'flags'")
        if rule and rule["name"] != r["name"]:
            sys.exit(f"{path}: rule for {key} names {rule['name']}, table says {r['name']}")
        r["rule"] = rule
    if flags:
        sys.exit(f"{path}: rules for unknown procedures: {sorted(flags)}")


def c_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def emit(rows, out):
    lines = [
        "/* Generated by tools/gen-proctable.py from data/procedures.tsv. Do not edit. */",
        '#include "proc.h"',
        "",
        "const struct vm_proc_info vm_proc_table[] = {",
    ]
    for r in rows:
        rule = r["rule"]
        if rule:
            pre = "VM_RO_ARG_DOM" if rule["prefix"] == "dom" else "VM_RO_ARG_NAME_DOM"
            test = "VM_RO_TEST_MASK" if rule["test"] == "mask" else "VM_RO_TEST_EQUALS"
            ro_rule = (f'{pre}, {rule["word"]}, {test}, {rule["value"]}u, '
                       f'{c_str(rule["message"])}')
        else:
            ro_rule = "VM_RO_ARG_NONE, 0, VM_RO_TEST_MASK, 0u, NULL"
        lines.append(
            f'    {{ {PROGRAMS[r["prog"]]}, {r["num"]}, "{r["name"]}", '
            f'{KINDS[r["kind"]]}, {RO[r["ro"]]}, {int(r["fds_in"])}, {int(r["fds_out"])}, '
            f'{int(r["cb_first"])}, {int(r["legacy"])}, '
            f'{c_str(r["api"]) if r["api"] else "NULL"}, {r["domain"]}, {ro_rule}, '
            f'{r["family"]}, {r["pair"]}, '
            f'{{ {", ".join(r["objects"][f] for f in OBJ_FAMILIES)} }} }},')
    lines += ["};", "",
              "const size_t vm_proc_table_len = sizeof(vm_proc_table) / sizeof(vm_proc_table[0]);",
              ""]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv):
    if len(argv) == 4 and argv[1] == "--check":
        rows = load(argv[2])
        attach_flags(rows, load_flags(argv[3]), argv[3])
        attach_families(rows, argv[2])
        print(f"{len(rows)} procedures, all classified")
        return 0
    if len(argv) != 5:
        sys.exit(__doc__)
    rows = load(argv[1])
    attach_flags(rows, load_flags(argv[2]), argv[2])
    attach_families(rows, argv[1])
    emit(rows, argv[3])
    emit_names(rows, argv[4])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
