/* model.h — model internals shared with the rooms above (model.c). */
#ifndef JM_MODEL_H
#define JM_MODEL_H

#include "base/base.h"

struct wview;
/* Parameter i's weight-matrix view as held (0 for norms, biases and routers). */
int model_param_view(const jm_model *m, int i, struct wview *w);

#endif
