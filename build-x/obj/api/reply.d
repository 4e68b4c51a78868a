build-x/obj/api/reply.o: api/reply.c api/api.h optim/optim.h
api/api.h:
optim/optim.h:
