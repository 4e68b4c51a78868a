build-x/obj/server/flags.o: server/flags.c server/server.h api/api.h \
 optim/optim.h server/engine.h storage/storage.h
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
