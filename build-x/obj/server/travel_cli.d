build-x/obj/server/travel_cli.o: server/travel_cli.c server/server.h \
 api/api.h optim/optim.h server/engine.h storage/storage.h
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
