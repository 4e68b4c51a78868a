build-x/obj/tests/support/daemon.o: tests/support/daemon.c \
 tests/support/daemon.h
tests/support/daemon.h:
