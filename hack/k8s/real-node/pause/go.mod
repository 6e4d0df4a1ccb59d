module kubetune.local/pause

go 1.24
