/* Logging: one line per event, each naming its object ("C#12 127.0.0.1:40522", "U#3 hv1"). */
#ifndef VM_LOG_H
#define VM_LOG_H

#include "fwd.h"

enum vm_log_level { VM_LOG_ERROR = 0, VM_LOG_WARN, VM_LOG_INFO, VM_LOG_DEBUG };

/* Set the threshold and the format (0 text, 1 JSON lines). */
void vm_log_setup(enum vm_log_level level, int json);
int vm_log_enabled(enum vm_log_level level);
/* Parse "error"/"warn"/"info"/"debug"; returns -1 if unknown. */
int vm_log_level_parse(const char *s);

/* Log one line about object `obj` (may be NULL for the process itself). */
void vm_log(enum vm_log_level level, const char *obj, const char *fmt, ...) VM_PRINTF(3, 4);

#define vm_err(obj, ...) vm_log(VM_LOG_ERROR, obj, __VA_ARGS__)
#define vm_warn(obj, ...) vm_log(VM_LOG_WARN, obj, __VA_ARGS__)
#define vm_info(obj, ...) vm_log(VM_LOG_INFO, obj, __VA_ARGS__)
#define vm_debug(obj, ...)                                      \
    do {                                                        \
        if (vm_log_enabled(VM_LOG_DEBUG))                       \
            vm_log(VM_LOG_DEBUG, obj, __VA_ARGS__);             \
    } while (0)

#endif
