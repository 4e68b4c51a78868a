build-x/obj/server/dashboard.o: server/dashboard.c server/observe.h \
 server/server.h api/api.h optim/optim.h server/engine.h \
 storage/storage.h
server/observe.h:
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
