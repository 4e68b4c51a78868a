build-x/obj/tests/support/apitest.o: tests/support/apitest.c \
 tests/support/apitest.h clients/c/optd_client.h tests/support/daemon.h
tests/support/apitest.h:
clients/c/optd_client.h:
tests/support/daemon.h:
