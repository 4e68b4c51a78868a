build-x/obj/optim/schedule.o: optim/schedule.c optim/optim.h
optim/optim.h:
