build-x/obj/api/safetensors.o: api/safetensors.c api/api.h optim/optim.h
api/api.h:
optim/optim.h:
