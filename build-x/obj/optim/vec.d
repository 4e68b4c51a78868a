build-x/obj/optim/vec.o: optim/vec.c optim/optim.h
optim/optim.h:
