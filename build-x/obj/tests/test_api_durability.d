build-x/obj/tests/test_api_durability.o: tests/test_api_durability.c \
 clients/c/optd_client.h tests/support/apitest.h tests/support/daemon.h
clients/c/optd_client.h:
tests/support/apitest.h:
tests/support/daemon.h:
