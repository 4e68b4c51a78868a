build-x/obj/server/engine.o: server/engine.c server/engine.h api/api.h \
 optim/optim.h storage/storage.h server/observe.h server/server.h
server/engine.h:
api/api.h:
optim/optim.h:
storage/storage.h:
server/observe.h:
server/server.h:
