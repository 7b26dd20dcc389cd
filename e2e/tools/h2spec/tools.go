//go:build tools

// Keeps the h2spec command in this module's requirements so `go build` can name it.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
