build-x/obj/tests/test_client_c.o: tests/test_client_c.c \
 clients/c/optd_client.h tests/support/apitest.h tests/support/daemon.h
clients/c/optd_client.h:
tests/support/apitest.h:
tests/support/daemon.h:
