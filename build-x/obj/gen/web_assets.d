build-x/obj/gen/web_assets.o: build-x/gen/web_assets.c server/observe.h \
 server/server.h api/api.h optim/optim.h server/engine.h \
 storage/storage.h
server/observe.h:
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
