build-x/obj/tests/test_faults.o: tests/test_faults.c optim/optim.h \
 tests/support/apitest.h clients/c/optd_client.h tests/support/daemon.h
optim/optim.h:
tests/support/apitest.h:
clients/c/optd_client.h:
tests/support/daemon.h:
