// The Go runtime's stem-cell bootstrap: harness.go does the work (ready, load, compile in the sandbox, exec).
package main

func main() {
	nanogridBootstrap()
}
