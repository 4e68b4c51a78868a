build-x/obj/tests/support/fixture.o: tests/support/fixture.c \
 tests/support/fixture.h optim/optim.h tests/support/gen.h
tests/support/fixture.h:
optim/optim.h:
tests/support/gen.h:
