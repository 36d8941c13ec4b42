// Package config is the shim's one configuration struct, read from the environment. The shim
// runs with dockerd's environment, so every default must work with an empty one; operators set
// these in dockerd's environment (e.g. a systemd drop-in for docker.service).
//
// The struct carries envconfig's tags (the README's table is generated from them) but the shim
// reads it without the envconfig package: its package initialisation compiles regular expressions
// and templates, which costs every shim process (one per published port) most of a mebibyte.
// config_test.go checks that Load reads the environment as envconfig.Process would.
package config

import (
	"fmt"
	"os"
	"reflect"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/statuspipe"
)

// Prefix is the prefix of every variable the shim reads.
const Prefix = "EDS"

// Config is everything the shim reads from its environment.
type Config struct {
	ShimSocket string        `envconfig:"SHIM_SOCKET" default:"/run/envoy-docker-shim/shim.sock" desc:"Unix socket (SOCK_SEQPACKET) on which envoy-docker-server takes the shims' registrations (shared with the server)."`
	Timeout    time.Duration `envconfig:"SHIM_TIMEOUT" default:"10s" desc:"Longest time the shim takes to report to dockerd that a port is ready or why not (dockerd gives up at 16s; at most 15s)."`
	SCTPProxy  string        `envconfig:"SCTP_PROXY" desc:"Path of Docker's stock docker-proxy; when set, SCTP ports (which Envoy cannot carry) are handed to it. When empty, publishing an SCTP port fails with an explanation."`
}

// Load reads the environment. Errors name the variable and are fit for the user of docker run.
func Load() (Config, error) {
	var c Config
	v := reflect.ValueOf(&c).Elem()
	for i := range v.NumField() {
		f := v.Type().Field(i)
		key := Prefix + "_" + f.Tag.Get("envconfig")
		// A variable set to "" means the default, as if unset.
		raw := os.Getenv(key)
		if raw == "" {
			raw = f.Tag.Get("default")
		}
		switch dst := v.Field(i).Addr().Interface().(type) {
		case *string:
			*dst = raw
		case *time.Duration:
			if raw == "" {
				continue
			}
			d, err := time.ParseDuration(raw)
			if err != nil {
				return c, fmt.Errorf("invalid envoy-docker-shim environment: %s=%q: not a duration such as 10s or 500ms", key, raw)
			}
			*dst = d
		default:
			panic(fmt.Sprintf("config: field %s has a type Load does not read", f.Name))
		}
	}
	if c.Timeout <= 0 || c.Timeout > statuspipe.MaxTimeout {
		return c, fmt.Errorf("invalid envoy-docker-shim environment: %s_SHIM_TIMEOUT=%s: must be more than 0 and at most %s (dockerd gives up at 16s)",
			Prefix, c.Timeout, statuspipe.MaxTimeout)
	}
	return c, nil
}
