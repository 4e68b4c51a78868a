build-x/obj/storage/fault.o: storage/fault.c storage/internal.h \
 storage/storage.h
storage/internal.h:
storage/storage.h:
