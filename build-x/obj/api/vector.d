build-x/obj/api/vector.o: api/vector.c api/api.h optim/optim.h
api/api.h:
optim/optim.h:
