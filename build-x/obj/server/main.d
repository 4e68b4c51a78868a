build-x/obj/server/main.o: server/main.c server/server.h api/api.h \
 optim/optim.h server/engine.h storage/storage.h
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
