build-x/obj/optim/clip.o: optim/clip.c optim/optim.h
optim/optim.h:
