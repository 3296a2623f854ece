module clusterd.example/shop

go 1.19
