build-x/obj/server/travel.o: server/travel.c server/server.h api/api.h \
 optim/optim.h server/engine.h storage/storage.h
server/server.h:
api/api.h:
optim/optim.h:
server/engine.h:
storage/storage.h:
