build-x/obj/tests/support/gen.o: tests/support/gen.c tests/support/gen.h \
 optim/optim.h
tests/support/gen.h:
optim/optim.h:
