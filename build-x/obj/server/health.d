build-x/obj/server/health.o: server/health.c server/server.h api/api.h \
 optim/optim.h server/engine.h storage/storage.h
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
