build-x/obj/clients/c/optd_client.o: clients/c/optd_client.c \
 clients/c/optd_client.h
clients/c/optd_client.h:
