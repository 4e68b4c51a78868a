build-x/obj/optim/optimizers.o: optim/optimizers.c optim/optim.h
optim/optim.h:
