"""Certificates, client PKI directories, sasldb files and libvirt auth files
for the authentication tests and benchmarks.

Everything is made with the ``openssl`` and ``saslpasswd2`` command-line
tools (Debian packages ``openssl`` and ``sasl2-bin``) in a directory the
caller owns; nothing touches /etc. Like harness.py this module does not need
pytest.

    pki = Pki(tmpdir)                       # CA "C=GB,O=Test,CN=Test CA"
    srv = pki.server("localhost")           # CN=localhost, SAN DNS:localhost,IP:127.0.0.1
    c1 = pki.client("client1")              # CN=client1, clientAuth
    d = pki.client_dir(c1)                  # DIR with cacert.pem, clientcert.pem, clientkey.pem
    old = pki.client("old", expired=True)   # validity ended in 2020
    other = Pki(tmpdir2, ca_cn="Other CA")  # a second, unrelated CA
    make_sasldb(path, {"alice": "secret"})
    write_authfile(path, "alice", "secret")

Certificates follow what libvirt's own sanity checks want: the CA has
basicConstraints CA:TRUE and keyCertSign; leaf certificates have
digitalSignature + keyEncipherment and serverAuth or clientAuth.
"""

import os
import shutil
import subprocess
import threading

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
SASLPASSWD2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"

DN_PREFIX = "/C=GB/O=Test"

# Certificate numbering must be unique per CA (a reload test compares
# serials); one counter for the whole process is the simplest way.
_serial_lock = threading.Lock()
_serial = [int.from_bytes(os.urandom(3), "big") << 8]


def _next_serial():
    with _serial_lock:
        _serial[0] += 1
        return _serial[0]


class PkiError(RuntimeError):
    pass


def _run(argv, input_text=None, cwd=None):
    try:
        r = subprocess.run(argv, input=input_text, capture_output=True,
                           text=True, timeout=60, cwd=cwd)
    except FileNotFoundError as e:
        raise PkiError("%s not found (Debian packages openssl / sasl2-bin, "
                       "see scripts/deps.sh)" % argv[0]) from e
    if r.returncode != 0:
        raise PkiError("%s failed (%d): %s" % (" ".join(argv), r.returncode,
                                               (r.stderr or r.stdout).strip()))
    return r.stdout


def libvirt_dn(cn, prefix=DN_PREFIX):
    """'/C=GB/O=Test' + cn -> 'C=GB,O=Test,CN=cn' (libvirt's DN order)."""
    parts = [p for p in prefix.split("/") if p]
    return ",".join(parts + ["CN=%s" % cn])


class Cert:
    """A key pair and certificate on disk."""

    def __init__(self, name, cert, key, serial, dn, ca):
        self.name = name
        self.cert = cert
        self.key = key
        self.serial = serial
        self.dn = dn          # libvirt order, e.g. C=GB,O=Test,CN=client1
        self.ca = ca          # the issuing Pki

    def __repr__(self):
        return "Cert(%s, serial=%d)" % (self.dn, self.serial)


_LEAF_EXT = """\
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = {eku}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
{san}
"""

_CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[ca]
default_ca = vca
[vca]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/newcerts
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[anything]
countryName = optional
organizationName = optional
commonName = supplied
"""


class Pki:
    """One certificate authority in `directory`, and the certificates it
    signs. `ca_cn` names the CA (its DN is C=GB,O=Test,CN=<ca_cn>)."""

    def __init__(self, directory, ca_cn="Test CA", bits=2048):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.bits = bits
        self.ca_cn = ca_cn
        self.ca_cert = os.path.join(self.dir, "cacert.pem")
        self.ca_key = os.path.join(self.dir, "cakey.pem")
        self.conf = os.path.join(self.dir, "ca.cnf")
        with open(self.conf, "w") as f:
            f.write(_CA_CONF.format(dir=self.dir))
        os.makedirs(os.path.join(self.dir, "newcerts"), exist_ok=True)
        open(os.path.join(self.dir, "index.txt"), "w").close()
        with open(os.path.join(self.dir, "serial"), "w") as f:
            # openssl ca wants an even number of hex digits
            f.write("%016x\n" % (_next_serial() | 0x1000000))
        _run([OPENSSL, "req", "-x509", "-new", "-nodes", "-config", self.conf,
              "-newkey", "rsa:%d" % bits, "-keyout", self.ca_key,
              "-out", self.ca_cert, "-days", "3650", "-sha256",
              "-set_serial", str(_next_serial()),
              "-subj", "%s/CN=%s" % (DN_PREFIX, ca_cn)])
        self.certs = {}

    # -- leaf certificates ---------------------------------------------

    def _leaf(self, name, cn, eku, san=None, expired=False, days=365,
              prefix=DN_PREFIX):
        base = os.path.join(self.dir, name)
        key, csr, cert = base + "-key.pem", base + ".csr", base + "-cert.pem"
        ext = base + ".ext"
        with open(ext, "w") as f:
            f.write(_LEAF_EXT.format(
                eku=eku, san=("subjectAltName = %s" % san) if san else ""))
        _run([OPENSSL, "req", "-new", "-nodes", "-newkey",
              "rsa:%d" % self.bits, "-keyout", key, "-out", csr,
              "-subj", "%s/CN=%s" % (prefix, cn)])
        if expired:
            # `openssl x509 -req` (OpenSSL 3.0) cannot set a start date in
            # the past; `openssl ca` can, with the minimal CA config above
            serial = int(open(os.path.join(self.dir, "serial")).read(), 16)
            _run([OPENSSL, "ca", "-batch", "-config", self.conf,
                  "-cert", self.ca_cert, "-keyfile", self.ca_key,
                  "-startdate", "20200101000000Z",
                  "-enddate", "20200201000000Z", "-notext",
                  "-extfile", ext, "-extensions", "leaf",
                  "-in", csr, "-out", cert])
        else:
            serial = _next_serial()
            _run([OPENSSL, "x509", "-req", "-in", csr, "-CA", self.ca_cert,
                  "-CAkey", self.ca_key, "-set_serial", str(serial),
                  "-days", str(days), "-sha256", "-extfile", ext,
                  "-extensions", "leaf", "-out", cert])
        os.chmod(key, 0o600)
        c = Cert(name, cert, key, serial, libvirt_dn(cn, prefix), self)
        self.certs[name] = c
        return c

    def server(self, cn="localhost", name=None,
               san="DNS:localhost,IP:127.0.0.1"):
        """A server certificate valid for localhost and 127.0.0.1."""
        return self._leaf(name or "server-%s-%d" % (cn, len(self.certs)), cn,
                          "serverAuth", san=san)

    def client(self, cn, name=None, expired=False, prefix=DN_PREFIX):
        """A client certificate with subject PREFIX/CN=cn."""
        return self._leaf(name or "client-%s%s" % (cn, "-expired" if expired
                                                  else ""),
                          cn, "clientAuth", expired=expired, prefix=prefix)

    # -- directories libvirt reads ---------------------------------------

    def client_dir(self, cert, directory=None, cacert=None):
        """A libvirt client pkipath: cacert.pem (this CA unless `cacert`),
        clientcert.pem, clientkey.pem."""
        d = directory or os.path.join(self.dir, "pki-%s" % cert.name)
        os.makedirs(d, exist_ok=True)
        shutil.copyfile(cacert or self.ca_cert, os.path.join(d, "cacert.pem"))
        shutil.copyfile(cert.cert, os.path.join(d, "clientcert.pem"))
        shutil.copyfile(cert.key, os.path.join(d, "clientkey.pem"))
        os.chmod(os.path.join(d, "clientkey.pem"), 0o600)
        return d

    def libvirtd_tls_conf(self, server_cert, allowed_dn=None):
        """libvirtd.conf keys for listen_tls with `server_cert` (the caller
        adds tls_port, auth_tls)."""
        conf = {"listen_tls": 1, "key_file": server_cert.key,
                "cert_file": server_cert.cert, "ca_file": self.ca_cert}
        if allowed_dn is not None:
            conf["tls_allowed_dn_list"] = list(allowed_dn)
        return conf


def cert_serial(pem_path):
    """The serial number of a PEM certificate file (int)."""
    out = _run([OPENSSL, "x509", "-noout", "-serial", "-in", pem_path])
    return int(out.strip().split("=", 1)[1], 16)


def replace_files(src_cert, dst_cert_path, dst_key_path):
    """Copy a certificate and key over existing files (atomically each)."""
    for src, dst in ((src_cert.cert, dst_cert_path),
                     (src_cert.key, dst_key_path)):
        tmp = dst + ".new"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, os.stat(src).st_mode & 0o777)   # keys stay private
        os.replace(tmp, dst)


# --------------------------------------------------------------------------
# SASL
# --------------------------------------------------------------------------

def make_sasldb(path, users, realm=None):
    """Create (or extend) a sasldb at `path` holding {user: password} for
    the service "libvirt" (saslpasswd2 -p -c -a libvirt -f PATH USER)."""
    for user, password in users.items():
        argv = [SASLPASSWD2, "-p", "-c", "-a", "libvirt", "-f", path]
        if realm:
            argv += ["-u", realm]
        _run(argv + [user], input_text=password)
    os.chmod(path, 0o600)
    return path


def write_sasl_conf(directory, sasldb, mechs="digest-md5 scram-sha-256"):
    """DIR/libvirt.conf for a libvirtd started with SASL_CONF_PATH=DIR."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "libvirt.conf"), "w") as f:
        f.write("mech_list: %s\nsasldb_path: %s\n" % (mechs, sasldb))
    return directory


def libvirtd_sasl_env(directory, users, mechs="digest-md5 scram-sha-256"):
    """A sasldb with `users` and a SASL config dir for a libvirtd: returns
    the env to start it with ({"SASL_CONF_PATH": DIR}); add auth_tcp /
    auth_tls = "sasl" to its libvirtd.conf."""
    os.makedirs(directory, exist_ok=True)
    db = make_sasldb(os.path.join(directory, "libvirtd.sasldb"), users)
    write_sasl_conf(directory, db, mechs)
    return {"SASL_CONF_PATH": directory}


def write_authfile(path, user, password, hosts=("127.0.0.1", "localhost")):
    """A libvirt auth file (URI ?authfile=PATH) answering the SASL username
    and password prompts of every libvirt service on `hosts`."""
    lines = ["[credentials-%s]" % user, "authname=%s" % user,
             "password=%s" % password]
    for h in hosts:
        lines += ["[auth-libvirt-%s]" % h, "credentials=%s" % user]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def write_password_file(path, password):
    with open(path, "w") as f:
        f.write(password + "\n")
    os.chmod(path, 0o600)
    return path


def auth_callback(user, password):
    """The credential list for libvirt.openAuth answering AUTHNAME and
    PASSPHRASE with user / password."""
    import libvirt

    def cb(creds, _opaque):
        for cred in creds:
            if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                cred[4] = user
            elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                cred[4] = password
            else:
                return -1
        return 0

    return [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], cb,
            None]


def pem_serial(pem_text):
    """The serial number of a PEM certificate given as text (int)."""
    out = _run([OPENSSL, "x509", "-noout", "-serial"], input_text=pem_text)
    return int(out.strip().split("=", 1)[1], 16)


def peer_certificate(port, host="127.0.0.1", client=None, cafile=None,
                     timeout=5.0):
    """TLS-connect to host:port (optionally presenting `client`, a Cert),
    and return (serial of the server certificate, first byte the server
    sent after the handshake or b"" if it closed). libvirt's servers send
    0x01 once they accept the client's certificate."""
    import socket
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=None)
    except Exception:
        raw.close()
        raise
    try:
        der = tls.getpeercert(binary_form=True)
        import ssl as _ssl
        serial = pem_serial(_ssl.DER_cert_to_PEM_cert(der))
        try:
            first = tls.recv(1)
        except (ssl.SSLError, ConnectionResetError, OSError):
            first = b""
        return serial, first
    finally:
        tls.close()


# --------------------------------------------------------------------------
# a TCP relay that records what passes (wire evidence for the tests)
# --------------------------------------------------------------------------

class TcpRelay:
    """Listens on a free loopback port and relays every connection to
    `target` (host, port), keeping a copy of the bytes in each direction
    (``up`` client->target, ``down`` target->client) and counting the
    connections it relayed (``accepted``)."""

    def __init__(self, target_port, target_host="127.0.0.1", listen_port=0):
        import socket
        self.target = (target_host, target_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.up = bytearray()
        self.down = bytearray()
        self._lock = threading.Lock()
        self._stop = False
        self._socks = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        import socket
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                self.accepted += 1
                self._socks += [c, u]
            for a, b, buf in ((c, u, self.up), (u, c, self.down)):
                threading.Thread(target=self._pump, args=(a, b, buf),
                                 daemon=True).start()

    def _pump(self, src, dst, buf):
        import socket
        src.settimeout(None)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                buf.extend(data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
