module meshproxy.local/pause

go 1.22
