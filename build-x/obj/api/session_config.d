build-x/obj/api/session_config.o: api/session_config.c api/api.h \
 optim/optim.h
api/api.h:
optim/optim.h:
