/* The name in an XML definition (a domain, network or pool): the text of the first <name>
 * child of the root element. A small scanner, not a parser: comments, processing instructions,
 * declarations, CDATA, quoted attribute values and the five predefined entities are
 * understood; anything it cannot read unambiguously (markup or character references inside
 * the name, an unterminated tag, a name with control characters) gives NULL, and callers
 * refuse rather than guess. */
#include "xmlname.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

static int name_char_ok(unsigned char c)
{
    return c >= 0x20 && c != 0x7f;
}

/* Decode the character data between p and end (entities, CDATA) into a malloc'd string;
 * NULL when it holds markup or anything odd. */
static char *xml_text(const char *p, const char *end)
{
    size_t cap = (size_t)(end - p) + 1;
    char *out = vm_calloc(1, cap), *o = out;
    while (p < end) {
        if (*p == '<') {
            static const char cdata[] = "<![CDATA[";
            if ((size_t)(end - p) >= sizeof(cdata) - 1 &&
                memcmp(p, cdata, sizeof(cdata) - 1) == 0) {
                const char *s = p + sizeof(cdata) - 1;
                const char *close = NULL;
                for (const char *q = s; q + 3 <= end; q++)
                    if (memcmp(q, "]]>", 3) == 0) {
                        close = q;
                        break;
                    }
                if (!close)
                    goto bad;
                memcpy(o, s, (size_t)(close - s));
                o += close - s;
                p = close + 3;
                continue;
            }
            goto bad; /* an element or comment inside <name>: not a plain name */
        }
        if (*p == '&') {
            static const struct {
                const char *ent;
                char c;
            } ents[] = {{"&lt;", '<'}, {"&gt;", '>'}, {"&amp;", '&'}, {"&quot;", '"'},
                        {"&apos;", '\''}};
            size_t i;
            for (i = 0; i < sizeof(ents) / sizeof(ents[0]); i++) {
                size_t n = strlen(ents[i].ent);
                if ((size_t)(end - p) >= n && memcmp(p, ents[i].ent, n) == 0) {
                    *o++ = ents[i].c;
                    p += n;
                    break;
                }
            }
            if (i == sizeof(ents) / sizeof(ents[0]))
                goto bad; /* character references and others: refuse rather than guess */
            continue;
        }
        *o++ = *p++;
    }
    *o = '\0';
    for (const char *c = out; *c; c++)
        if (!name_char_ok((unsigned char)*c) && *c != '\t' && *c != '\n' && *c != '\r')
            goto bad;
    if (!*out)
        goto bad;
    return out;
bad:
    free(out);
    return NULL;
}

/* Step over a comment, processing instruction or declaration at p ("<!--", "<?", "<!");
 * returns the position after it or NULL. */
static const char *skip_special(const char *p, const char *end)
{
    const char *close;
    size_t closelen;
    if (end - p >= 4 && memcmp(p, "<!--", 4) == 0) {
        close = "-->";
        closelen = 3;
        p += 4;
    } else if (end - p >= 2 && p[1] == '?') {
        close = "?>";
        closelen = 2;
        p += 2;
    } else {
        /* <!DOCTYPE ...> (no internal subset) or <![CDATA[ outside <name> */
        if (end - p >= 9 && memcmp(p, "<![CDATA[", 9) == 0) {
            close = "]]>";
            closelen = 3;
        } else {
            close = ">";
            closelen = 1;
        }
        p += 2;
    }
    for (; p + closelen <= end; p++)
        if (memcmp(p, close, closelen) == 0)
            return p + closelen;
    return NULL;
}

/* The end of the start or end tag at p ('<'), quotes respected; NULL if unterminated. */
static const char *tag_end(const char *p, const char *end)
{
    char quote = 0;
    for (p++; p < end; p++) {
        if (quote) {
            if (*p == quote)
                quote = 0;
        } else if (*p == '"' || *p == '\'') {
            quote = *p;
        } else if (*p == '<') {
            return NULL;
        } else if (*p == '>') {
            return p;
        }
    }
    return NULL;
}

static int tag_is(const char *p, const char *tend, const char *name)
{
    size_t n = strlen(name);
    if ((size_t)(tend - p) < n || memcmp(p, name, n) != 0)
        return 0;
    char c = p[n];
    return c == '>' || c == '/' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

char *xmlname_of(const char *xml, size_t len, const char *root)
{
    const char *p = xml, *end = xml + len;
    int depth = 0;
    while (p < end) {
        if (*p != '<') {
            p++;
            continue;
        }
        if (end - p >= 2 && (p[1] == '!' || p[1] == '?')) {
            p = skip_special(p, end);
            if (!p)
                return NULL;
            continue;
        }
        const char *te = tag_end(p, end);
        if (!te)
            return NULL;
        if (p[1] == '/') {
            if (--depth <= 0)
                return NULL; /* the root closed without a <name> */
            p = te + 1;
            continue;
        }
        int selfclosing = te[-1] == '/';
        if (depth == 0) {
            if (!tag_is(p + 1, te, root) || selfclosing)
                return NULL;
        } else if (depth == 1 && tag_is(p + 1, te, "name")) {
            if (selfclosing)
                return NULL;
            const char *s = te + 1, *q;
            /* the text runs to the first "</name" that is not inside CDATA */
            for (q = s; q < end; q++) {
                if (end - q >= 9 && memcmp(q, "<![CDATA[", 9) == 0) {
                    const char *c = q + 9;
                    while (c + 3 <= end && memcmp(c, "]]>", 3) != 0)
                        c++;
                    if (c + 3 > end)
                        return NULL;
                    q = c + 2;
                    continue;
                }
                if (end - q >= 7 && memcmp(q, "</name", 6) == 0 &&
                    (q[6] == '>' || q[6] == ' ' || q[6] == '\t' || q[6] == '\n' ||
                     q[6] == '\r'))
                    return xml_text(s, q);
            }
            return NULL;
        }
        if (!selfclosing)
            depth++;
        p = te + 1;
    }
    return NULL;
}
