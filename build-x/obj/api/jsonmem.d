build-x/obj/api/jsonmem.o: api/jsonmem.c api/api.h optim/optim.h
api/api.h:
optim/optim.h:
