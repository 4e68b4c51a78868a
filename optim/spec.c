/*
 * spec.c -- what every hyperparameter table shares: filling a config
 * struct with the table's defaults.
 */
#include "optim/optim.h"

#include <string.h>

void optim_specs_default(const optim_hp_spec *specs, size_t n, void *base)
{
    for (size_t i = 0; i < n; i++) {
        const optim_hp_spec *s = &specs[i];
        char *at = (char *)base + s->offset;
        switch (s->type) {
        case OPTIM_HP_NUM:
        case OPTIM_HP_NUM_INF:
            memcpy(at, &s->def[0], sizeof(double));
            break;
        case OPTIM_HP_PAIR:
            memcpy(at, s->def, 2 * sizeof(double));
            break;
        case OPTIM_HP_BOOL: {
            bool b = s->def[0] != 0;
            memcpy(at, &b, sizeof b);
            break;
        }
        case OPTIM_HP_ENUM: {
            int e = (int)s->def[0];
            memcpy(at, &e, sizeof e);
            break;
        }
        case OPTIM_HP_INT: {
            int64_t v = (int64_t)s->def[0];
            memcpy(at, &v, sizeof v);
            break;
        }
        case OPTIM_HP_INT_LIST: {
            size_t zero = 0; /* lists default to empty */
            memcpy((char *)base + s->count_offset, &zero, sizeof zero);
            break;
        }
        }
    }
}
