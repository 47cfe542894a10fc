// Package ext stands in for Traefik's nested extension module, which the Go module proxy does not serve.
package ext

// HTTP is embedded inline in Traefik's dynamic HTTP configuration; the open-source build adds no fields.
type HTTP struct{}

// Router is embedded inline in Traefik's router configuration; the open-source build adds no fields.
type Router struct{}
