/* model_err.h: per-thread error message of the model library (kvq_last_error belongs to libkvq; the model
 * layer keeps its own so that a GGUF or tokenizer failure can say what was wrong). */
#ifndef KVQ_MODEL_ERR_H
#define KVQ_MODEL_ERR_H

#include "kvq.h"

/* Message of the last failing kvq_model call on this thread; "" if none. */
const char *kvqm_last_error(void);
/* Records a printf-style message and returns `st`, so callers can write `return kvqm_fail(st, ...)`. */
kvq_status kvqm_fail(kvq_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kvqm_clear_error(void);

#endif
