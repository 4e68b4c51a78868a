module optd.dev/client/go

go 1.19
