build-x/obj/optim/kernels.o: optim/kernels.c optim/optim.h \
 optim/kernels_body.h
optim/optim.h:
optim/kernels_body.h:
