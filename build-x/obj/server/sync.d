build-x/obj/server/sync.o: server/sync.c server/observe.h server/server.h \
 api/api.h optim/optim.h server/engine.h storage/storage.h
server/observe.h:
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
