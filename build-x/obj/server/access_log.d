build-x/obj/server/access_log.o: server/access_log.c server/observe.h \
 server/server.h api/api.h optim/optim.h server/engine.h \
 storage/storage.h
server/observe.h:
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
