/* The name in an XML definition, for grants (see xmlname.c). */
#ifndef VM_XMLNAME_H
#define VM_XMLNAME_H

#include <stddef.h>

/* The first <name> child of the root element, which must be `root` ("domain", "network",
 * "pool"); malloc'd, or NULL when it cannot be read unambiguously. */
char *xmlname_of(const char *xml, size_t len, const char *root);

#endif
