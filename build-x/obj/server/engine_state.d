build-x/obj/server/engine_state.o: server/engine_state.c server/engine.h \
 api/api.h optim/optim.h storage/storage.h
server/engine.h:
api/api.h:
optim/optim.h:
storage/storage.h:
