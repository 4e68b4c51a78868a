module optd.dev/tests/cross/worker_go

go 1.19

require optd.dev/client/go v0.0.0

replace optd.dev/client/go => ../../../clients/go
