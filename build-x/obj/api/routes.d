build-x/obj/api/routes.o: api/routes.c api/api.h optim/optim.h
api/api.h:
optim/optim.h:
