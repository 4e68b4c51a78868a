build-x/obj/storage/storage.o: storage/storage.c storage/internal.h \
 storage/storage.h
storage/internal.h:
storage/storage.h:
