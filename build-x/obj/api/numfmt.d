build-x/obj/api/numfmt.o: api/numfmt.c api/api.h optim/optim.h
api/api.h:
optim/optim.h:
