build-x/obj/server/http.o: server/http.c server/observe.h server/server.h \
 api/api.h optim/optim.h server/engine.h storage/storage.h
server/observe.h:
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
