build-x/obj/tests/test_storage.o: tests/test_storage.c storage/storage.h
storage/storage.h:
