#include "model_err.h"

const char *kvqm_last_error(void) { return kvq_last_error(); }

void kvqm_clear_error(void) { kvq_set_error(KVQ_OK, "%s", ""); }
