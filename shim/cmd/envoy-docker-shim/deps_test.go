package main

import (
	"os/exec"
	"strings"
	"testing"
)

// Issue 4: an idle shim uses no more memory than docker-proxy. Package initialisation is most of
// an idle Go process's memory, so the shim must not link these (the benchmark in testbed/e2e
// measures the result; this test says which import broke it).
func TestShimLinksNoHeavyPackages(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	heavy := map[string]string{
		"google.golang.org/grpc":               "grpc-go (the shim registers over internal/shimlink)",
		"google.golang.org/protobuf":           "the protobuf runtime (internal/shimlink's messages are URL queries)",
		"golang.org/x/net/http2":               "an HTTP/2 stack",
		"github.com/kelseyhightower/envconfig": "envconfig (shim/config reads the same struct tags itself)",
		"net/http":                             "net/http",
		"crypto/tls":                           "crypto/tls",
		"regexp":                               "regexp",
		"text/template":                        "text/template",
	}
	for _, pkg := range strings.Fields(string(out)) {
		for prefix, what := range heavy {
			if pkg == prefix || strings.HasPrefix(pkg, prefix+"/") {
				t.Errorf("the shim links %s via %s", what, pkg)
			}
		}
	}
}
