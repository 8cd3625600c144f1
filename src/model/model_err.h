/* model_err.h: errors of the model library. Messages go to libkvq's per-thread kvq_last_error() (kvq_set_error),
 * so a GGUF, tokenizer or cache failure reads the same way; the kvqm_ names are kept for the model code. */
#ifndef KVQ_MODEL_ERR_H
#define KVQ_MODEL_ERR_H

#include "kvq.h"

/* Message of the last failing kvq_model call on this thread; "" if none. */
const char *kvqm_last_error(void);
/* Records a printf-style message and returns `st`, so callers can write `return kvqm_fail(st, ...)`. */
#define kvqm_fail kvq_set_error
void kvqm_clear_error(void);

#endif
