build-x/obj/optim/spec.o: optim/spec.c optim/optim.h
optim/optim.h:
